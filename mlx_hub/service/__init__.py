"""Running the hub as a service: the library facade (api), the daemon, its runtime files."""
