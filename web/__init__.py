"""HTTP server: Flask app factory and one blueprint per API dialect."""
