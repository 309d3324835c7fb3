"""What the command line offers around the engine: local infrastructure, the demo, the simulator, replay, reading
topics, evaluation. Never imported by the runtime, the pipeline or the domain (tests/unit/test_architecture.py)."""
