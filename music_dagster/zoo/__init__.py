"""Foundation models: loading each role, the tiny zoo, the full profile's dry run, devices, CLIP similarity."""
