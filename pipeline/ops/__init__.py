"""What operators look at: the Prometheus exporter of the checkpoint table.

May import the store's Protocols and the shared value objects; never the worker side or the
command line.
"""
