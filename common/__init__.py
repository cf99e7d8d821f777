"""What every layer of the gateway may use: no models, not a Django app, imports nothing of ours."""
