// Hub unit tests: being written.
