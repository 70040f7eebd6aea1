"""`python -m bench`: the gateway's benchmark suite, side by side with Nchan when installed."""
