"""Webhooks for consumers: endpoints, events, signed delivery."""
