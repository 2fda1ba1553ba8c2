"""Test beds with real third-party software (see testbed/htcondor.py)."""
