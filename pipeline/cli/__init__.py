"""The `pipeline` command line: parses, calls, prints; and what it starts on a user's
machine (the private servers, worker and Flower processes, the demo).

Nothing else in the package imports it.
"""
