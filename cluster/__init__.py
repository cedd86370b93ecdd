"""The serving cluster: the router (Serve ingress, public gRPC API) and the application builder."""
