"""Change trackers and change logs (the file driver's durable per-disk log)."""
