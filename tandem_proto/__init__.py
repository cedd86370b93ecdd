"""gRPC stubs of proto/tandem/v1, generated into ``tandem_proto.v1`` by scripts/gen_proto.py
(scripts/setup.sh runs it); the generated modules are not committed and never edited."""
