"""gRPC and HTTP front ends; they call into the stages, nothing imports them."""
