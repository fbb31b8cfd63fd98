"""Running the service: logs, metrics, systemd notifications, status webhooks, recording retention."""
