"""Who may use the service: endpoints and their API tokens."""
