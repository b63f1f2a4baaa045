"""The broker: a ZeroMQ ROUTER between HTTP frontends and GPU workers. Imports no torch."""
