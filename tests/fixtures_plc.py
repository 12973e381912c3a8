"""The reference PLC (pymodbus server) on a free loopback port, per test."""
