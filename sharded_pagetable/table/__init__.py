"""The single-process table: host rows and their publication, validation, the seed API."""
