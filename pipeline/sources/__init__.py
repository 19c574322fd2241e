"""Where files come from and how they are found: URLs, reading files, submit and watch.

May import the store's Protocols, the sender and the shared value objects; never the worker
side or the command line.
"""
