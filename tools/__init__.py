"""funnelgate's tools: one module per tool, each a schema plus a pure mapping to CAPI events."""
