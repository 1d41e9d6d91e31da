from hfedmoe.cli import main

main()
