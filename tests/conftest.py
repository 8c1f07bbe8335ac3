"""Shared pytest configuration: plugins every suite may use."""

# The lab fixtures (`lab`, `lab_factory`, `wait_for`): racks in network namespaces.
pytest_plugins = ["meshcloud.lab.pytest_plugin"]
