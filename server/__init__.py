"""funnelgate: an ActionKit-compatible tool endpoint that delivers conversion events to Meta."""
