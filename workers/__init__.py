"""Ray Serve deployments hosting the gRPC Draft and Verify services (cluster -> workers -> tandem)."""
