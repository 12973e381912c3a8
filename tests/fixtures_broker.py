"""A real mosquitto on a free loopback port, per test."""
