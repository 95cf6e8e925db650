// Prints the MSK IAM token that AWS's own Go signer makes, for the
// differential test in ../msk_iam.rs. Credentials come from the arguments
// (test values only), so nothing here reads a real credential chain.
//
// Usage: msk-iam-go-signer REGION ACCESS_KEY SECRET_KEY SESSION_TOKEN
// Output: one line, "<token> <expiry in ms since the epoch>".
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/aws/aws-msk-iam-sasl-signer-go/signer"
	"github.com/aws/aws-sdk-go-v2/credentials"
)

func main() {
	if len(os.Args) != 5 {
		fmt.Fprintln(os.Stderr, "usage: msk-iam-go-signer REGION ACCESS_KEY SECRET_KEY SESSION_TOKEN")
		os.Exit(2)
	}
	provider := credentials.NewStaticCredentialsProvider(os.Args[2], os.Args[3], os.Args[4])
	token, expiryMs, err := signer.GenerateAuthTokenFromCredentialsProvider(context.Background(), os.Args[1], provider)
	if err != nil {
		fmt.Fprintln(os.Stderr, "signing failed:", err)
		os.Exit(1)
	}
	fmt.Printf("%s %d\n", token, expiryMs)
}
