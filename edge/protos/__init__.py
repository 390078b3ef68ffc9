"""Python modules generated from ``proto/`` by ``make proto`` (grpcio-tools). Do not edit.

They are committed so that a plain ``pip install`` works without grpcio-tools; a test checks
that they match the ``.proto`` sources. Their descriptors live in :data:`POOL`, not in
protobuf's default pool: ``tritonclient.grpc`` registers its own ``model_config.proto`` (same
file name, same package ``inference``) there, and both must import into one process.
"""

from google.protobuf import descriptor_pool

#: The descriptor pool of every generated module in this package.
POOL = descriptor_pool.DescriptorPool()
