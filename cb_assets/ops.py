"""Jobs, schedules and sensors (operations). Filled in by the operations issue."""
jobs: list = []
schedules: list = []
sensors: list = []
