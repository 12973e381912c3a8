"""Line integration: machine telemetry, commands from the line, live parameter adjustments."""
