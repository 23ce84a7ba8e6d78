"""The trio transport: listeners, connections, requests in flight, shutdown."""
