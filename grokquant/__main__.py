from grokquant.cli import main

main()
