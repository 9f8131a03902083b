from omotool.cli import main

main()
