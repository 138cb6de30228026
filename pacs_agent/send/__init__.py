"""Sending: the outbox of results and the C-STORE SCU that delivers them."""
