"""sdqueue's shared, torch-free layer: settings, the request schema, the model registry,
the database tables and the storage layout. Both producer and worker import from here."""
