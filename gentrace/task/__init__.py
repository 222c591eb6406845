"""What a run trains: data sets, networks, losses, the training-state checkpoint layout and size budgets."""
