"""Local stand-ins for the hosted services Prism calls, for tests: nothing here reaches the internet."""
