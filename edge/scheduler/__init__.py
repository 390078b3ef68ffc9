"""Per-model queues, dynamic batching, priorities and deadlines."""
