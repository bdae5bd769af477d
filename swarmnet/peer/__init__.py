"""The peer daemon and its services: compute loop, snapshot server, exchange, membership."""
