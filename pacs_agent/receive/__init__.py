"""Receiving: the C-STORE / C-ECHO service class provider and the durable spool."""
