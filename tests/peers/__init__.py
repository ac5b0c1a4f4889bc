"""Real peer processes (Orthanc, ...) that tests start on loopback ports and end by PID."""
