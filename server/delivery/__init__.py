"""Delivery to Meta's Graph API: the HTTP client and the retry policy."""
