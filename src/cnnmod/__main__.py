from cnnmod.cli import main

main()
