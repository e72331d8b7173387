"""Alerting: rules over the appliance's own signals (policies/alerts.toml), evaluated in the server, delivered to an
Alertmanager or a webhook, shown by `appliance alerts list` and GET /api/alerts, and exported as Prometheus rules."""
