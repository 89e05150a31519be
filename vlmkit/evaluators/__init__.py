"""The built-in evaluators, registered from ``vlmkit/registry.yaml``. The machinery that runs
them (generation, likelihoods, scoring, the runner) is kernel: :mod:`vlmkit.core.evaluation`."""
