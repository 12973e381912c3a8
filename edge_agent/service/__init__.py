"""Running as a service: systemd's notify protocol and watchdog, reload on SIGHUP, and the
optional health and metrics endpoint. Nothing here runs unless systemd or the config asks."""
