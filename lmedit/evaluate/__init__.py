"""Evaluation: CounterFact / zsRE metrics as pure functions of log-probs, batched scoring, experiments."""
