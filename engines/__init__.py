"""Model code without Ray: generators, the intent classifier, the upscaler. Unit-testable on its own."""
