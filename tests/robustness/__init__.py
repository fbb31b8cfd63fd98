"""Robustness suite (issue 9): property-based API tests, hostile input, injected faults, access, soak."""
