from tokmarg.cli import main

main()
