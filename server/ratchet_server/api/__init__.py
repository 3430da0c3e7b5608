"""gRPC servicers: translate protobuf to engine calls and back, check auth."""
