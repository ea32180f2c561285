"""The ``usseg`` command line: parse options, build one spec, start its flow, print (see docs/architecture.md)."""
