"""The paper's experiments at small scale: the demo, synthetic shapes, figures."""
