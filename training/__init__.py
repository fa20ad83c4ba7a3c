"""Config schema, model, data, optimizer, schedules and the training loop."""
