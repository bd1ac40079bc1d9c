"""Search algorithms: pure, seeded, checkpointable. No Ray, Redis or gRPC in here."""
